"""The batch loop of a compile: teacher forward and extraction on the main thread, writes on a background thread.

    main thread:    batch -> teacher forward (inference_mode) -> extraction on the real positions
                    (+ per-sequence sums of the full distribution, for the store's tail prior) -> queue
    writer thread:  queue -> device-to-host copy -> per-sample rows -> StoreWriter.add -> shards on disk

The queue is bounded, so memory holds a few batches whatever the corpus size, and the teacher never waits
for the disk. Padding positions are never extracted nor stored. A batch whose samples are all committed is
skipped; one that is partly committed (the shard rolled over inside it) is recomputed and only its missing
samples are added.
"""

from __future__ import annotations

import itertools
import queue
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from labelstore.errors import ConfigMismatchError, InvalidLogitsError, LabelStoreError
from labelstore.store.bitpack import packed_nbytes
from labelstore.store.format import has_tail_column
from labelstore.store.locations import read_store_config
from labelstore.teacher.batching import (
    auto_tokens_per_batch,
    bytes_per_token,
    free_memory,
    pad_batch,
    row_ids,
)
from labelstore.teacher.head import body_hidden, plan_head, read_head
from labelstore.teacher.inputs import Plan
from labelstore.teacher.model import input_device
from labelstore.teacher.prior import MassAccumulator, teacher_mass
from labelstore_kernels import extract_fused, head_logits
from labelstore_kernels.fused_head_torch import rows_per_block

QUEUE_BATCHES = 2  # extracted batches waiting for the writer thread (bounds memory)


@dataclass
class CompileResult:
    out: str
    rank: int
    world_size: int
    samples: int  # sequences this rank added
    tokens: int  # tokens this rank added
    skipped: int  # sequences of this rank's batches already committed before this run
    seconds: float  # wall time of the batch loop (forward, extraction, writes)
    cpu_seconds: float = 0.0  # process CPU time of the same loop, all threads
    input_stats: dict | None = None  # documents, tokens and (truncate mode) what was cut off: Plan.stats
    units: dict | None = None  # --plan units: this rank's units, skipped (committed) and tokenized ones


class WriterThread(threading.Thread):
    """Takes extracted batches off a bounded queue, copies them to the host and adds them to the store."""

    def __init__(self, writer, plan: Plan | None, hard: bool, bytes_per_value: int, bar, tracker=None):
        super().__init__(name="labelstore-writer", daemon=True)
        self.writer, self.plan, self.hard, self.bpv, self.bar = writer, plan, hard, bytes_per_value, bar
        self.tracker = tracker  # --plan units: told of each row before the writer adds it
        self.has_tail = has_tail_column(writer.meta)  # False for hard labels and pure `sample` stores
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self.error: BaseException | None = None
        self.samples = self.tokens = self.payload = 0
        meta = writer.meta
        self._bits, self._count_bytes = meta["id_bits"], meta["count_bytes"]
        self._t0 = time.perf_counter()

    def run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain so the producer never blocks
            try:
                self._write(*item)
            except BaseException as exc:  # handed to the main thread
                self.error = exc

    def _write(self, plan: Plan, batch: np.ndarray, lengths: np.ndarray, todo: np.ndarray, ex, mass) -> None:
        if plan is not self.plan:  # --plan units: the first batch of the next unit
            self.plan = plan
            if hasattr(self.writer, "set_plan"):
                self.writer.set_plan(plan)
            if self.tracker is not None:
                self.tracker.begin(plan.unit, len(plan), plan.fingerprint)
        mass = mass.cpu().numpy() if mass is not None else None
        ids = ex.ids.cpu().numpy()
        counts = ex.counts.cpu().numpy()
        values = ex.values.cpu().numpy()
        tail = ex.tail.cpu().numpy()
        k = ids.shape[1]
        ends = np.cumsum(lengths)
        for r, sid in enumerate(batch):
            if not todo[r]:
                continue
            a, b = int(ends[r] - lengths[r]), int(ends[r])
            c = counts[a:b]
            if self.hard or bool((c == k).all()):
                s_ids = ids[a:b].reshape(-1)
                s_vals = values[a:b].reshape(-1)
            else:
                keep = np.arange(k)[None, :] < c[:, None]
                s_ids = ids[a:b][keep]
                s_vals = values[a:b].reshape(b - a, k, self.bpv)[keep].reshape(-1)
            ds = self.plan.doc_starts(int(sid))
            if mass is not None:  # before add(): a shard committed by add() then owns this sequence's mass
                self.writer.add_teacher_mass(mass[r], b - a)
            if self.tracker is not None:  # likewise: a commit record written by add() covers this row
                self.tracker.add(int(sid))
            self.writer.add(int(sid), self.plan.sequence(int(sid)), c, s_ids, s_vals,
                            tail[a:b] if self.has_tail else np.zeros(0, np.float32), ds)
            T, n = b - a, int(c.sum())
            self.samples += 1
            self.tokens += T
            self.payload += (16 + packed_nbytes(T, self._bits) + T * self._count_bytes
                             + packed_nbytes(n, self._bits) + n * self.bpv + (4 * T if self.has_tail else 0)
                             + 4 * ds.size)
        if self.bar is not None:
            dt = max(time.perf_counter() - self._t0, 1e-9)
            self.bar.update(int(todo.sum()))
            self.bar.set_postfix_str(f"{self.tokens:,} tokens, {self.tokens / dt:,.0f} tok/s, "
                                     f"{self.payload / max(self.tokens, 1):.1f} B/tok", refresh=False)


def run_batches(model, plan, mine, writer, extract_fn, V, codec, opts, device, pad_id, rank, world,
                vocab_limit: int | None = None, notice: bool | None = None, follower: bool = False,
                work=None, counts=None, before_close=None):
    """Compile this rank's batches ``mine`` into ``writer`` (module docstring); returns this rank's figures.

    ``vocab_limit`` (``--mask-vocab-padding``: the tokenizer's size) gives the ids at and above it probability 0.
    Where the logits come from (fused or materialised) is decided here, once, by
    :func:`labelstore.teacher.head.plan_head` (its notice printed where ``notice``, default on rank 0).
    ``follower``: a non-leader member of a tensor-parallel group (:mod:`labelstore.teacher.parallel`) runs the
    leader's forwards and nothing else; ``writer`` is then a :class:`~labelstore.teacher.parallel.FollowerWriter`.
    ``work`` (``--plan units``, instead of ``plan`` and ``mine``): ``(plan, batches, todo masks)`` per work unit,
    produced lazily (:func:`labelstore.teacher.units.unit_work`, which fills ``counts``). ``before_close``: called
    once every batch is written, before the writer closes (an error it raises leaves the rank unfinished).
    """
    total, skipped = None, 0
    if work is None:
        committed = writer.committed_ranges()  # [start, end) runs: never expanded id by id
        todo_masks = [~writer.committed_mask(b, committed) for b in mine]
        total = int(sum(int(t.sum()) for t in todo_masks))
        skipped = int(sum(len(b) for b in mine)) - total
        work = [(plan, mine, todo_masks)]
    work = iter(work)
    head_item = next(work, None)
    items = itertools.chain([] if head_item is None else [head_item], work)
    probe = None
    if head_item is not None:
        p0, b0, m0 = head_item
        first = next((b[t] for b, t in zip(b0, m0) if t.any()), None)
        probe = None if first is None else torch.from_numpy(p0.sequence(int(first[0])).astype(np.int64))
    hp = plan_head(model, opts.lm_head, head_dtype=opts.head_dtype, valid_vocab=vocab_limit, probe_ids=probe,
                   device=input_device(model, device), notice=(rank == 0) if notice is None else notice)
    if hp.head is not None and hp.head.vocab_size != V:
        raise ConfigMismatchError(f"the teacher's LM head has {hp.head.vocab_size} rows, expected its output "
                                  f"vocabulary of {V}")
    selection = opts.selection_meta(V)
    adaptive = selection["mode"] == "adaptive"  # extraction needs each row's budget group (its sample)
    device = input_device(model, device)  # under --device-map: where the embedding lives
    if follower:
        result = follow_batches(model, hp, items, pad_id, device, rank, world)
        if before_close is not None:
            before_close()
        return result
    bar = None
    if opts.progress and rank == 0:
        from labelstore.teacher.progress import progress_bar  # tqdm on a terminal, timed lines in a log

        bar = progress_bar(total, f"compile{'' if world == 1 else f' rank 0/{world}'}")
    thread = WriterThread(writer, plan, opts.hard_labels, codec.bytes_per_value, bar,
                          tracker=getattr(writer, "unit_progress", None))
    thread.start()
    t0, c0 = time.perf_counter(), time.process_time()
    ok = False
    try:
        with torch.inference_mode():
            for plan, mine, todo_masks in items:
                for batch, todo in zip(mine, todo_masks):
                    if not todo.any():
                        continue
                    if thread.error is not None:
                        break
                    x, m, lengths = pad_batch(plan, batch, pad_id)
                    rids = row_ids(batch, lengths, opts.max_length)
                    groups = budget_groups(plan, rids, opts.max_length) if adaptive else None
                    if hp.fused:
                        ex, mass = fused_batch(model, hp, batch, x, m, lengths, rids, selection, codec, opts, device,
                                               groups=groups)
                    else:
                        ex, mass = materialised_batch(model, hp, batch, x, m, lengths, rids, extract_fn, V, opts,
                                                      device, groups=groups)
                    thread.queue.put((plan, batch, lengths, todo, ex, mass))
                if thread.error is not None:
                    break
        thread.queue.put(None)
        thread.join()
        if thread.error is not None:
            raise thread.error
        if before_close is not None:
            before_close()
        writer.close()
        ok = True
    finally:
        if not ok:
            # Error or Ctrl-C: let the writer thread finish the row it is adding (a shard it is committing
            # completes), drop the queued batches, then discard only the open shard. A second Ctrl-C
            # meanwhile is ignored so that the cleanup cannot be cut short; it takes at most one batch.
            old = None
            if threading.current_thread() is threading.main_thread():
                old = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                if thread.is_alive():
                    thread.error = thread.error or RuntimeError("aborted")
                    thread.queue.put(None)
                    thread.join()
                writer.abort()
            finally:
                if old is not None:
                    signal.signal(signal.SIGINT, old)
        if bar is not None:
            bar.close()
    if counts is not None:
        skipped = counts.skipped
    return CompileResult(out=str(opts.out), rank=rank, world_size=world, samples=thread.samples,
                         tokens=thread.tokens, skipped=skipped, seconds=time.perf_counter() - t0,
                         cpu_seconds=time.process_time() - c0)


def resolve_tokens_per_batch(opts, model, V: int, device: torch.device) -> int:
    """``--tokens-per-batch``: the number given, or for ``auto`` the value a store being resumed recorded (the
    batches, hence the numerics, stay those of the first run), else what fits the free memory of ``device``
    (:func:`labelstore.teacher.batching.auto_tokens_per_batch`) on the path the head allows."""
    if opts.tokens_per_batch != "auto":
        return int(opts.tokens_per_batch)
    try:  # compile_config since 0.2 (compared on resume), runtime before
        cfg = read_store_config(opts.out)
        return int(cfg["compile_config"].get("tokens_per_batch", cfg["runtime"]["tokens_per_batch"]))
    except (LabelStoreError, OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # a new store
    head, _ = read_head(model)
    fused = head is not None and opts.lm_head != "materialized"
    w = next(model.parameters())
    head_bytes = 4 if opts.head_dtype == "float32" else w.element_size()
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    per_token = bytes_per_token(cfg, V, opts.max_length, w.element_size(), fused, head_bytes)
    fixed = rows_per_block(V, device) * V * 4 * 2 if fused else 0  # the logits block and its float32 work copy
    return auto_tokens_per_batch(free_memory(device), device.type, per_token, fixed, opts.max_length)


def follow_batches(model, hp, items, pad_id, device, rank, world) -> CompileResult:
    """A tensor-parallel follower: the same forwards as its group's leader (each is a collective), no output.
    ``items``: ``(plan, batches, todo masks)``, the leader's."""
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for plan, mine, todo_masks in items:
            for batch, todo in zip(mine, todo_masks):
                if not todo.any():
                    continue
                x, m, _ = pad_batch(plan, batch, pad_id)
                if hp.head is None:
                    model(input_ids=x.to(device), attention_mask=m.to(device), use_cache=False)
                else:
                    body_hidden(model, x.to(device), m.to(device))
    return CompileResult(out="", rank=rank, world_size=world, samples=0, tokens=0, skipped=0,
                         seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - c0)


def budget_groups(plan: Plan, rids: np.ndarray, max_length: int) -> np.ndarray:
    """Selection ``adaptive``: the budget group of each real position of a batch, its sample id (docs/FORMAT.md
    5b: the mean entries are a per-sample budget, so a sample gets the same entries in any batch or rank). With
    ``--assistant-only`` the positions that store no label get -1 (no budget): the sample's budget goes to its
    labelled positions only. A batch always holds whole samples."""
    groups = np.asarray(rids, dtype=np.int64) // max_length
    keep = plan.keep_rows(rids, max_length)
    return groups if keep is None else np.where(keep, groups, -1)


def real_rows(m: torch.Tensor) -> torch.Tensor | None:
    """Indices of the real (non-padding) positions of a flattened batch, None when nothing is padded."""
    flat = m.reshape(-1)
    return None if bool((flat != 0).all()) else flat.nonzero().flatten()


def materialised_batch(model, hp, batch, x, m, lengths, rids, extract_fn, V, opts, device, groups=None):
    """One batch through ``model(...).logits`` (or, with ``hp.head``, the body then that head on every row).
    ``groups`` (selection ``adaptive``): each row's budget group, passed on to ``extract_fn``."""
    real = real_rows(m)
    if hp.head is None:
        logits = model(input_ids=x.to(device), attention_mask=m.to(device), use_cache=False).logits
        if logits.shape[-1] != V:
            raise ConfigMismatchError(f"the teacher returned {logits.shape[-1]} logits per position, "
                                      f"expected its output vocabulary of {V}")
        flat = logits.reshape(-1, V)
        if real is not None:  # padding positions are never extracted
            flat = flat[real.to(flat.device)]
    else:
        h = body_hidden(model, x.to(device), m.to(device))
        h = h.reshape(-1, h.shape[-1])
        flat = head_logits(h if real is None else h[real.to(h.device)], hp.head)
    try:
        ex = extract_fn(flat, rids) if groups is None else extract_fn(flat, rids, groups=groups)
    except InvalidLogitsError as exc:
        raise locate_invalid(exc, batch, lengths) from None
    mass = teacher_mass(flat, ex.lse, lengths, opts.temperature) if opts.uses_tail_prior else None
    return ex, mass


def fused_batch(model, hp, batch, x, m, lengths, rids, selection, codec, opts, device, groups=None):
    """One batch from the body's final hidden states: the ``[N, V]`` logits never exist (row blocks only)."""
    h = body_hidden(model, x.to(device), m.to(device))
    h = h.reshape(-1, h.shape[-1])
    real = real_rows(m)
    if real is not None:
        h = h[real.to(h.device)]
    acc = (MassAccumulator(lengths, hp.head.vocab_size, opts.temperature, hp.head.weight.device)
           if opts.uses_tail_prior else None)
    try:
        ex = extract_fused(h, hp.head, selection, temperature=opts.temperature, codec=codec, seed=opts.seed,
                           row_ids=rids, on_block=None if acc is None else (lambda s0, z, e: acc.add(s0, z, e.lse)),
                           groups=groups)
    except InvalidLogitsError as exc:
        raise locate_invalid(exc, batch, lengths) from None
    return ex, None if acc is None else acc.out


def locate_invalid(exc: InvalidLogitsError, batch: np.ndarray, lengths: np.ndarray) -> InvalidLogitsError:
    """Rename the kernel's row numbers as (sample id, position) pairs."""
    ends = np.cumsum(lengths)
    where = []
    for row in exc.rows[:4]:
        r = int(np.searchsorted(ends, row, side="right"))
        where.append(f"sample {int(batch[r])} position {int(row - (ends[r] - lengths[r]))}")
    msg = (f"the teacher produced invalid logits at {', '.join(where)}: {exc}. Nothing of this batch was "
           "stored; committed shards are intact.")
    return InvalidLogitsError(msg, rows=exc.rows)
