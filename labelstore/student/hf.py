"""Hugging Face integration: a store as a ``datasets.Dataset`` (zero-copy) and a ``transformers.Trainer``.

``datasets``
------------
A store's shards are Arrow IPC *file* format (random access, a footer). ``datasets.Dataset.from_file`` reads the
IPC *stream* format (it calls ``pyarrow.ipc.open_stream``), so it cannot open them. :func:`to_hf_dataset`
memory-maps every shard with ``pyarrow.ipc.open_file`` as a :class:`ShardTable` (a ``datasets``
``MemoryMappedTable`` that reopens the *file* format) and concatenates them (no copy: the columns become chunked
arrays over the maps); the shards' bytes are never copied into memory or through Python objects. Pickling the
dataset (DataLoader workers under ``spawn``/``forkserver``, ``map(num_proc=...)``) carries the shard paths, not
their bytes, as ``datasets.Dataset.from_file`` would. A ``set_transform`` decodes rows on access into the items of
:mod:`labelstore.student.dataset` (each binary cell passes through one Python ``bytes`` object, as ``datasets``'
formatter hands it over). Slices (``select``, ``shard``, ``train_test_split``) stay pickled by reference;
``map``/``filter``/``save_to_disk`` write new files (a copy, as for any dataset).

``transformers``
----------------
``Trainer`` drops dataset columns (and, for torch datasets, item keys) that its model's ``forward`` does not
accept when ``remove_unused_columns=True`` (the default), which would silently strip the teacher targets.
:class:`DistillationTrainer` turns that option off, collates with the store's
:class:`~labelstore.student.collate.Collator`,
runs the model on ``input_ids``/``attention_mask`` only, and computes the loss with
:func:`labelstore.student.losses.distillation_loss` (or ``loss_fn``); a batch without teacher targets is refused, never
trained on silently.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from collections.abc import Mapping

import numpy as np
import pyarrow as pa
import torch
from transformers import Trainer, TrainingArguments

from labelstore.constants import IGNORE_INDEX
from labelstore.errors import ConfigMismatchError, StoreCorruptError
from labelstore.store.format import PAYLOAD_COLUMNS, build_schema, meta_from_schema
from labelstore.student.collate import TEACHER_KEYS, Collator
from labelstore.student.dataset import TargetDecoder, as_store
from labelstore.student.targets import model_vocab_size

logger = logging.getLogger(__name__)

_DECODE_COLUMNS = ("sample_id", "num_tokens", *PAYLOAD_COLUMNS, "crc32")


def open_shard(path: str, meta: dict | None = None, rows: int | None = None) -> pa.Table:
    """One shard as a memory-mapped ``pyarrow.Table`` (zero-copy) with nullable fields (as ``datasets`` declares
    them; otherwise it would cast, i.e. copy, every column). ``meta``/``rows``: what the manifest says it holds."""
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        t = reader.read_all()
    except (pa.ArrowException, OSError) as exc:
        raise StoreCorruptError(f"shard {path} cannot be read as an Arrow IPC file ({exc})") from None
    shard_meta = meta_from_schema(reader.schema, str(path))
    if (meta is not None and shard_meta != meta) or (rows is not None and t.num_rows != rows):
        raise StoreCorruptError(f"shard {path} disagrees with the manifest (metadata or row count)")
    schema = pa.schema([f.with_nullable(True) for f in build_schema(shard_meta)])
    return pa.Table.from_arrays([pa.chunked_array(t.column(j).chunks, type=f.type) for j, f in enumerate(schema)],
                                schema=schema)


def store_table(store) -> pa.Table:
    """All shards of a store as one memory-mapped ``pyarrow.Table`` (zero-copy), in store order."""
    return pa.concat_tables([b.table for b in shard_tables(store)]) if len(as_store(store, True)) else _empty(store)


def _empty(store) -> pa.Table:
    s = as_store(store, True)
    return pa.schema([f.with_nullable(True) for f in build_schema(s.meta)]).empty_table()


def shard_tables(store) -> list:
    """One :class:`ShardTable` per shard of the store, in store order."""
    s = as_store(store, True)
    out = []
    for i in range(s.num_shards):
        rec = s.shard_record(i)
        path = s.shard_file(i)  # a remote store's shards are downloaded into its cache (all of them: see README)
        out.append(ShardTable(open_shard(str(path), s.meta, rec["rows"]), str(path)))
    return out


try:  # the `hf` extra
    from datasets.table import MemoryMappedTable
except ImportError:  # pragma: no cover - to_hf_dataset says what to install
    MemoryMappedTable = object


class ShardTable(MemoryMappedTable):
    """A ``datasets`` memory-mapped table over one shard (Arrow IPC *file* format), pickled by path: unpickling
    reopens the shard's memory map (``datasets``' own ``MemoryMappedTable`` reopens only the stream format)."""

    def __setstate__(self, state):
        table = self._apply_replays(open_shard(state["path"]), state["replays"])
        MemoryMappedTable.__init__(self, table, path=state["path"], replays=state["replays"])


def _keep_class(name: str):
    """``MemoryMappedTable``'s transforms return the base class, which would reopen the shard as an IPC stream when
    unpickled: keep them ShardTables."""

    def method(self, *args, **kwargs):
        out = getattr(MemoryMappedTable, name)(self, *args, **kwargs)
        if type(out) is MemoryMappedTable:
            out.__class__ = ShardTable
        return out

    method.__name__ = name
    return method


if MemoryMappedTable is not object:
    for _name in ("slice", "filter", "flatten", "combine_chunks", "cast", "replace_schema_metadata", "add_column",
                  "append_column", "remove_column", "set_column", "rename_columns", "drop", "select"):
        if hasattr(MemoryMappedTable, _name):
            setattr(ShardTable, _name, _keep_class(_name))


class HFDecoder:
    """``set_transform`` callable: a batch of raw store columns -> a batch of items (lists of numpy arrays)."""

    def __init__(self, targets):
        self.targets = targets

    def collator(self, **kwargs) -> Collator:
        return self.targets.collator(**kwargs)

    @property
    def vocab_size(self) -> int:
        return self.targets.vocab_size

    def __call__(self, batch: dict) -> dict:
        missing = [c for c in _DECODE_COLUMNS if c not in batch]
        if missing:
            raise ConfigMismatchError(
                f"store rows lack columns {missing}: something removed them (transformers.Trainer does so with "
                "remove_unused_columns=True). Keep all columns: use labelstore.student.hf.DistillationTrainer or pass "
                "remove_unused_columns=False"
            )
        t = self.targets
        s = t.store
        out: dict[str, list] = {}
        for r in range(len(batch["sample_id"])):
            parts = {c: np.frombuffer(batch[c][r], dtype=np.uint8) for c in PAYLOAD_COLUMNS}
            sid = int(batch["sample_id"][r])
            where = f"store {s.path} sample {sid}"
            raw = s.decode_row(sid, int(batch["num_tokens"][r]), parts, int(batch["crc32"][r]), where)
            for key, val in t.finish_raw(raw).items():
                out.setdefault(key, []).append(val)
        return out


def to_hf_dataset(store, *, decode: bool = True, **options):
    """Open a store as a ``datasets.Dataset`` over its memory-mapped shards (no copy).

    Rows hold the stored columns (``sample_id``, ``num_tokens``, the byte columns, ``crc32``). With ``decode``
    (default) a transform turns them into :mod:`labelstore.student.dataset` items on access; ``options`` are
    :class:`~labelstore.student.dataset.StoreDataset`'s (student vocabulary check, id map, temperature...). The
    store's metadata is in ``ds.info.description`` (JSON). Use :func:`store_collator` (or
    ``DistillationTrainer``) to batch.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError("to_hf_dataset needs the `datasets` package: pip install 'labelstore[hf]'") from None
    from datasets.table import ConcatenationTable, InMemoryTable

    targets = TargetDecoder(store, **options)
    blocks = shard_tables(targets.store)
    table = ConcatenationTable.from_blocks([[b] for b in blocks]) if blocks else InMemoryTable(_empty(targets.store))
    digest = hashlib.sha256(json.dumps(targets.store.manifest, sort_keys=True).encode()).hexdigest()[:16]
    info = datasets.DatasetInfo(description=json.dumps(targets.store.meta, sort_keys=True))
    ds = datasets.Dataset(table, info=info, fingerprint=f"labelstore-{digest}")
    if decode:
        ds.set_transform(HFDecoder(targets))
    return ds


def store_collator(dataset, **kwargs) -> Collator:
    """The :class:`Collator` for a :class:`~labelstore.student.dataset.StoreDataset` or a :func:`to_hf_dataset`
    dataset."""
    if hasattr(dataset, "collator"):
        return dataset.collator(**kwargs)
    fmt = getattr(dataset, "format", None) or {}
    transform = (fmt.get("format_kwargs") or {}).get("transform")
    if isinstance(transform, HFDecoder):
        return transform.collator(**kwargs)
    raise TypeError(f"{type(dataset).__name__} is not a labelstore dataset; pass data_collator explicitly")


def _student_vocab(dataset) -> int | None:
    if hasattr(dataset, "vocab_size"):
        return int(dataset.vocab_size)
    fmt = getattr(dataset, "format", None) or {}
    transform = (fmt.get("format_kwargs") or {}).get("transform")
    return transform.vocab_size if isinstance(transform, HFDecoder) else None


_SCALES_ITSELF = "loss_is_scaled_for_ga" in vars(Trainer)  # this transformers honours a subclass's flag


class DistillationTrainer(Trainer):
    """``transformers.Trainer`` that trains a student on a label store's teacher targets.

    Args (besides Trainer's):
        loss_fn: ``loss_fn(student_logits, batch, **loss_kwargs) -> scalar``; default
            :func:`labelstore.student.losses.distillation_loss` (forward sparse KL with the tail).
        loss_kwargs: e.g. ``{"alpha": 0.9, "method": "forward_kl"}`` (the temperature comes from the batches:
            re-temper the targets with the dataset's ``temperature=``).

    ``remove_unused_columns`` is turned off on a copy of ``args`` (a warning says so), the default collator is the
    store's, and the model's output vocabulary must equal the dataset's student vocabulary (ConfigMismatchError
    otherwise).

    Gradient accumulation and many devices: with the default loss, each optimizer step's loss is the token-weighted
    mean over all its micro-batches (and, with ``average_tokens_across_devices``, all devices), as transformers'
    own losses compute it with ``num_items_in_batch``: the distillation term over every teacher position and the CE
    term over every next-token label of the step, not a mean of micro-batch means. A custom ``loss_fn`` without a
    ``num_items`` argument gets the per-micro-batch mean divided by the accumulation steps. transformers releases
    whose ``Trainer`` has no ``loss_is_scaled_for_ga`` (it scales every loss by the steps itself) get the old mean
    of micro-batch means, correctly scaled.
    """

    # compute_loss normalises by the counts of the whole accumulation step (or divides by its length itself).
    # transformers releases without this flag divide every loss by the accumulation steps themselves: there
    # compute_loss returns the per-micro-batch mean and lets them (see _SCALES_ITSELF).
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args=None, *, loss_fn=None, loss_kwargs=None, **kwargs):
        if args is None:
            args = TrainingArguments(output_dir="tmp_trainer", remove_unused_columns=False)
        elif args.remove_unused_columns:
            logger.warning("DistillationTrainer: using remove_unused_columns=False so the teacher targets reach "
                           "compute_loss (Trainer would drop them: the model's forward does not take them)")
            args = copy.copy(args)  # the caller's arguments stay as they were
            args.remove_unused_columns = False
        train = kwargs.get("train_dataset")
        if kwargs.get("data_collator") is None and train is not None:
            kwargs["data_collator"] = store_collator(train)
        want = _student_vocab(train) if train is not None else None
        have = model_vocab_size(model) if model is not None else None
        if want is not None and have is not None and have != want:
            raise ConfigMismatchError(
                f"the student model outputs {have} logits per position but the dataset's targets are over {want} "
                "tokens; build the dataset with the student: StoreDataset(store, student=(model, tokenizer)) or "
                "to_hf_dataset(store, student=...), adding id_map='shared_prefix' for a padded head of the same "
                "tokenizer"
            )
        super().__init__(model=model, args=args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the model computes no loss here; compute_loss does
        from labelstore.student.losses import distillation_loss

        self.loss_fn = loss_fn or distillation_loss
        self.loss_kwargs = dict(loss_kwargs or {})
        self._token_weighted = self.loss_fn is distillation_loss and self.loss_kwargs.get("reduction", "mean") == "mean"

    def _get_num_items_in_batch(self, batch_samples: list, device) -> dict | None:
        """Teacher positions and next-token labels over every micro-batch of this optimizer step (summed over the
        devices with ``average_tokens_across_devices``): the denominators of the step's token-weighted means."""
        if not _SCALES_ITSELF:  # an older transformers: it scales by the accumulation steps (see compute_loss)
            return super()._get_num_items_in_batch(batch_samples, device)
        if not batch_samples or not all(isinstance(b, Mapping) and "position_mask" in b for b in batch_samples):
            return None
        counts = torch.zeros(2, dtype=torch.int64)
        for b in batch_samples:
            counts[0] += int(b["position_mask"].sum())
            if b.get("shift_labels") is not None:
                counts[1] += int((b["shift_labels"] != IGNORE_INDEX).sum())
        world = 1
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            counts = self.accelerator.gather(counts.to(device)).reshape(-1, 2).sum(0)
            world = self.args.world_size
        return {"distill": counts[0].to(device), "ce": counts[1].to(device), "world": world}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        missing = [k for k in TEACHER_KEYS if k not in inputs]
        if missing:
            raise ConfigMismatchError(
                f"batch lacks teacher targets {missing} (keys: {sorted(inputs)}); collate with the store's Collator "
                "and keep remove_unused_columns=False"
            )
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if _SCALES_ITSELF and self._token_weighted and isinstance(num_items_in_batch, Mapping):
            loss = self.loss_fn(logits, inputs, **self.loss_kwargs, num_items=num_items_in_batch)
            # devices' gradients are averaged: a sum over devices of (local sum / global count) needs x world
            loss = loss * num_items_in_batch.get("world", 1)
        else:
            steps = max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
            scale = steps if (_SCALES_ITSELF and model.training) else 1
            loss = self.loss_fn(logits, inputs, **self.loss_kwargs) / scale
        return (loss, outputs) if return_outputs else loss
